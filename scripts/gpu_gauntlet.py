"""The gauntlet over the standard library on a GPU, and how repeatable its numbers are.

    python scripts/gpu_gauntlet.py --out docs/bench-gauntlet-gpu.json --variance-runs 2

1. `esper library init` in a workspace (the 20 standard blueprints), unless --workspace names
   one that exists;
2. `esper forge --once --device cuda` builds the `fast` and `standard` kernels of every blueprint
   for one linear and one conv2d interface: several forge processes on the one workspace, as an
   operator would run them (claims keep them apart). `--no-forge` skips it;
3. the bench (`esper bench --once --device cuda`, through `Bench`): every kernel judged in its
   own sandboxed child. Past --bench-budget-s no new kernel is claimed: the rest stay
   PENDING_BENCHMARKING for the next invocation on the same --workspace;
4. variance across identical runs (HLD E.5 stage 1: < 5% for the key metrics). An identical run
   is what the bench does: a fresh sandboxed child per kernel (`run_gauntlet_sandboxed`, the
   bench's job and limits), never repeats inside one long-lived process, whose state drifts.
   `--variance-runs N` sweeps N more times over the VALIDATED kernels (or `--variance-kernels
   K` of them: the fast and standard kernels of blueprints spread over the interfaces; with
   `--variance-same-machine`, only kernels this invocation's bench judged), one child per
   kernel per sweep, so runs of one kernel are minutes apart; with the bench's own run that is
   N + 1 runs per kernel. For each key metric, the coefficient of variation (sample standard
   deviation / mean, CV%) across a kernel's runs; the figure is its median, 90th percentile and
   maximum over the kernels, and how many are under 5%. The children report where their time
   went (`stage_seconds`), summarised as `child_cost_seconds`.

State (forge and bench summaries, variance runs) is kept beside the workspace, so a run split
over several invocations (one command may only run so long) writes one --out. No new child is
started past --budget-s (seconds since this invocation began), so --out is always written.
Needs a CUDA device (`--device cpu` only to try the script out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
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
from pipelines.urabrask.bench import Bench, BenchOptions, default_limits
from pipelines.urabrask.gauntlet import GauntletJob, hardware_context
from pipelines.urabrask.sandbox import run_gauntlet_sandboxed

KEY_METRICS = ("latency_ms_mean", "latency_ms_p50", "train_step_ms_mean", "memory_mb_peak",
               "precision_drift_vs_fp64")
ESPER = [sys.executable, "-c", "import sys; from esper_cli.main import main; sys.argv[0] = 'esper'; main()"]
CHILD_ESTIMATE_S = 15.0  # a gauntlet child's time before any was seen (~11 s on an H100)


def cv_pct(values: list[float]) -> float:
    """Sample standard deviation over the mean, in percent (0 for identical values)."""
    mean = statistics.fmean(values)
    return 100.0 * statistics.stdev(values) / mean if mean else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank style: the value at round(q * (n - 1)) of the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def environment(device: str) -> dict[str, object]:
    """Hardware and versions, as this process sees them."""
    env: dict[str, object] = dict(hardware_context(device))
    env.update(platform=platform.platform(), torch=torch.__version__,
               cuda=torch.version.cuda, python=platform.python_version())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        env["cudnn"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}")
        try:
            query = ("--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                     "clocks.max.mem,power.limit")
            smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], check=False,
                                 capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    return env


def forge(ws: Workspace, args: argparse.Namespace, interfaces: list[str]) -> dict[str, object]:
    started = time.monotonic()
    forge_cmd = [*ESPER, "--workspace", str(ws.root), "--json", "forge", "--once", "--device",
                 args.device, "--pipelines", args.pipelines,
                 *[f"--interface={i}" for i in interfaces]]
    procs = [subprocess.Popen([*forge_cmd, "--worker-id", f"forge-{n}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(args.forges)]
    summaries = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            print(err[-2000:], file=sys.stderr)
        summaries.append(json.loads(out) if out.strip() else {"error": err[-500:]})
    seconds = time.monotonic() - started
    built = sum(len(s.get("built", [])) for s in summaries)
    failed = [f for s in summaries for f in s.get("failed", [])]
    print(f"forge: {built} kernels built, {len(failed)} failed by {args.forges} forges in "
          f"{seconds:.1f} s", flush=True)
    return {"command": forge_cmd[3:], "processes": args.forges, "seconds": seconds,
            "kernels_built": built, "failures": failed}


def bench(ws: Workspace, args: argparse.Namespace, stop_at: float) -> dict[str, object]:
    """The bench over every pending kernel; no new claim once `stop_at` would be passed."""
    started = time.monotonic()
    options = BenchOptions(device=args.device, worker_id="bench-gpu")
    with Urza.open(ws) as urza:
        seen: list[float] = []

        def progress(line: str) -> None:
            print(line, flush=True)
            if " VALIDATED " in line or " REJECTED" in line:
                seen.append(time.monotonic())
                typical = (seen[-1] - started) / len(seen)
                if time.monotonic() + typical > stop_at:
                    runner.request_stop()

        runner = Bench(ws, urza, None, options, progress=progress)
        summary = runner.run(once=True)
        pending = len(urza.list_kernels(status=KernelStatus.PENDING_BENCHMARKING))
    seconds = time.monotonic() - started
    print(f"bench: {summary.validated} validated, {summary.rejected} rejected in {seconds:.1f} s"
          f"; {pending} left pending", flush=True)
    return {"seconds": seconds, "summary": summary.to_jsonable(), "left_pending": pending}


def variance_runs(ws: Workspace, args: argparse.Namespace, state: dict, stop_at: float) -> None:
    """Sweeps of fresh sandboxed children over the VALIDATED kernels, as the bench runs them."""
    options = BenchOptions(device=args.device, worker_id="bench-gpu")
    with Urza.open(ws) as urza:
        validated = urza.list_kernels(status=KernelStatus.VALIDATED)
        if args.variance_same_machine:
            benched_now = {j["kernel_id"] for j in state["bench"][-1]["summary"]["jobs"]}
            validated = [k for k in validated if k.id in benched_now]
        names = {k.blueprint_id: urza.get_blueprint(k.blueprint_id).name for k in validated}
    kernels = variance_subset(validated, names, args.variance_kernels)
    state["variance_kernels"] = kernels
    runs: dict[str, list] = state.setdefault("variance_runs", {})
    scratch = Path(tempfile.mkdtemp(prefix="gauntlet-variance-"))
    for sweep in range(args.variance_runs):
        for kernel_id in kernels:
            done = runs.setdefault(kernel_id, [])
            if len(done) > sweep:
                continue
            times = [r["seconds"] for rs in runs.values() for r in rs]
            typical = statistics.median(times) if times else CHILD_ESTIMATE_S
            if time.monotonic() + 1.5 * typical > stop_at:
                print(f"variance: budget reached in sweep {sweep + 1}", flush=True)
                return
            job = GauntletJob(kernel_id=kernel_id, device=args.device, rounds=options.rounds,
                              round_seconds=options.round_seconds)
            outcome = run_gauntlet_sandboxed(ws.root, job, default_limits(), scratch_dir=scratch)
            result = outcome.result
            run = {"sweep": sweep + 1, "seconds": outcome.seconds,
                   "peak_rss_mb": outcome.peak_rss_mb,
                   "passed": bool(result is not None and result.passed),
                   "reason": outcome.reason if result is None else result.reason,
                   "metrics": result.metrics if result is not None else {},
                   "baseline": result.baseline if result is not None else {},
                   "stage_seconds": result.stage_seconds if result is not None else {}}
            done.append(run)
            latency = run["metrics"].get("latency_ms_mean", float("nan"))
            failed = "" if run["passed"] else f" FAILED: {run['reason']}"
            print(f"variance sweep {sweep + 1}: {kernel_id:38} {latency:8.4f} ms "
                  f"({outcome.seconds:.1f} s){failed}", flush=True)


def variance_subset(validated: list, names: dict[str, str], limit: int | None) -> list[str]:
    """Every VALIDATED kernel, or (`limit`) the fast and standard kernels of blueprints evenly
    spaced in name order within each interface, the interfaces taking turns."""
    if not limit or limit >= len(validated):
        return [k.id for k in validated]
    pairs: dict[str, dict[str, list]] = {}  # interface -> blueprint name -> kernels
    for k in validated:
        pairs.setdefault(str(k.interface), {}).setdefault(names[k.blueprint_id], []).append(k)
    per_interface = [[ks for _, ks in sorted(by_name.items())] for _, by_name in
                     sorted(pairs.items())]
    chosen: list[str] = []
    share = max(1, -(-limit // (2 * len(per_interface))))  # blueprints per interface
    for groups in per_interface:
        step = max(1, len(groups) // share)
        for group in groups[::step][:share]:
            chosen += [k.id for k in sorted(group, key=lambda k: k.compilation_pipeline.value)]
    return chosen[:limit] if len(chosen) > limit else chosen


def rows_and_figure(ws: Workspace, state: dict) -> tuple[list[dict], dict, bool, list[str]]:
    bench_seconds = {j["kernel_id"]: j["seconds"] for b in state.get("bench", [])
                     for j in b["summary"]["jobs"]}
    rows = []
    with Urza.open(ws) as urza:
        for kernel in urza.list_kernels():
            report = kernel.validation_report
            row = {"kernel": kernel.id, "blueprint": urza.get_blueprint(kernel.blueprint_id).name,
                   "pipeline": kernel.compilation_pipeline.value,
                   "interface": str(kernel.interface), "status": kernel.status.value,
                   "tags": kernel.tags,
                   "reason": report.rejection_reason if report else kernel.status_reason,
                   "bench": report.benchmark_results if report else {},
                   "baseline": report.baseline_comparison if report else {},
                   "risk_score": report.risk_score if report else None,
                   "conf_level": report.conf_level if report else None,
                   "bench_child_seconds": bench_seconds.get(kernel.id),
                   "variance_runs": state.get("variance_runs", {}).get(kernel.id, [])}
            runs = ([row["bench"]] if row["bench"] else []) + [
                r["metrics"] for r in row["variance_runs"] if r["passed"]]
            row["runs_counted"] = len(runs)
            if len(runs) >= 2:
                row["cv_pct_across_runs"] = {m: cv_pct([r[m] for r in runs]) for m in KEY_METRICS
                                             if all(m in r for r in runs)}
            rows.append(row)
        verify = urza.verify()
    figure = {}
    for metric in KEY_METRICS:
        values = [r["cv_pct_across_runs"][metric] for r in rows
                  if metric in r.get("cv_pct_across_runs", {})]
        counts = [r["runs_counted"] for r in rows if metric in r.get("cv_pct_across_runs", {})]
        if values:
            figure[metric] = {"kernels": len(values), "runs_per_kernel_min": min(counts),
                              "runs_per_kernel_max": max(counts),
                              "median_cv_pct": statistics.median(values),
                              "p90_cv_pct": percentile(values, 0.9), "max_cv_pct": max(values),
                              "under_5pct": sum(v < 5.0 for v in values)}
    return rows, figure, verify.ok, verify.problems


def cost(rows: list[dict]) -> dict[str, object]:
    """Where a gauntlet child's time goes (medians over the variance runs)."""
    runs = [r for row in rows for r in row["variance_runs"] if r["stage_seconds"]]
    if not runs:
        return {}
    stages = sorted({s for r in runs for s in r["stage_seconds"]})
    out: dict[str, object] = {"runs": len(runs),
                              "child_seconds_median": statistics.median(r["seconds"] for r in runs)}
    for pipeline in ("fast", "standard"):
        mine = [r for row in rows if row["pipeline"] == pipeline for r in row["variance_runs"]
                if r["stage_seconds"]]
        if mine:
            medians = {s: statistics.median(r["stage_seconds"].get(s, 0.0) for r in mine)
                       for s in stages}
            medians["child_total"] = statistics.median(r["seconds"] for r in mine)
            medians["after_profile"] = (medians["child_total"] - medians.get("process_before", 0)
                                        - sum(medians.get(s, 0) for s in ("load", "gatekeep",
                                                                          "profile")))
            out[pipeline] = medians
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workspace", type=Path, default=None,
                        help="reused if it exists (default: a new temporary one)")
    parser.add_argument("--interface", action="append",
                        default=None, help="default: linear:512:128 and conv2d:64:32:1")
    parser.add_argument("--forge", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--forges", type=int, default=8)
    parser.add_argument("--pipelines", default="fast,standard")
    parser.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bench-budget-s", type=float, default=None,
                        help="claim no new kernel past this many seconds (default: --budget-s)")
    parser.add_argument("--variance-runs", type=int, default=0,
                        help="sweeps of fresh sandboxed children over the VALIDATED kernels")
    parser.add_argument("--variance-kernels", type=int, default=None,
                        help="only this many kernels (fast and standard of the same "
                             "blueprints, spread over the interfaces); default: all")
    parser.add_argument("--variance-same-machine", action="store_true",
                        help="only kernels this invocation's bench judged (the earlier ones may "
                             "have run on another machine)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="start no child past this many seconds of this invocation")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script out")
    args = parser.parse_args()
    interfaces = args.interface or ["linear:512:128", "conv2d:64:32:1"]
    started = time.monotonic()

    ws = Workspace(args.workspace or Path(tempfile.mkdtemp()) / "ws")
    state_path = ws.root.parent / f"{ws.root.name}.gpu-gauntlet-state.json"
    if not (ws.root / "workspace.json").exists():
        init_workspace(ws)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    state["environment"] = environment(args.device)
    invocation = {"argv": [Path(sys.argv[0]).as_posix(), *sys.argv[1:]],
                  "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "environment": state["environment"]}
    state.setdefault("invocations", []).append(invocation)
    state["interfaces"] = interfaces

    def save() -> None:
        invocation["seconds"] = time.monotonic() - started
        state_path.write_text(json.dumps(state, indent=1, default=str))

    if args.forge:
        state["forge"] = forge(ws, args, interfaces)
        save()
    if args.bench:
        stop_at = started + (args.bench_budget_s if args.bench_budget_s else args.budget_s)
        state.setdefault("bench", []).append(bench(ws, args, stop_at))
        save()
    if args.variance_runs:
        try:
            variance_runs(ws, args, state, started + args.budget_s)
        finally:
            save()

    rows, figure, verify_ok, verify_problems = rows_and_figure(ws, state)
    within = {m: [row["bench"][m] for row in rows if m in row["bench"]]
              for m in ("latency_cv_pct", "train_step_cv_pct")}
    result = {
        "environment": state["environment"], "invocations": state["invocations"],
        "interfaces": interfaces, "forge": state.get("forge"), "bench": state.get("bench", []),
        "variance_method": "each run a fresh sandboxed child per kernel "
                           "(run_gauntlet_sandboxed, the bench's GauntletJob and limits); the "
                           "bench's own run counts as the first; CV = sample stdev / mean",
        "variance_kernels": state.get("variance_kernels"),
        "variance_across_runs": figure,
        "within_run_cv_pct_of_round_means": {
            m: {"median": statistics.median(v), "p90": percentile(v, 0.9), "max": max(v)}
            for m, v in within.items() if v},
        "child_cost_seconds": cost(rows),
        "verify_ok": verify_ok, "verify_problems": verify_problems, "kernels": rows,
    }
    save()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for row in rows:
        cv = row.get("cv_pct_across_runs", {})
        print(f"{row['kernel']:38} {row['blueprint']:26} {row['status']:10} "
              f"{row['bench'].get('latency_ms_mean', float('nan')):8.4f} ms  runs "
              f"{row['runs_counted']}  cv mean {cv.get('latency_ms_mean', float('nan')):5.2f}% "
              f"p50 {cv.get('latency_ms_p50', float('nan')):5.2f}%")
    for metric, f in figure.items():
        print(f"variance {metric:26} median CV {f['median_cv_pct']:.2f}%  "
              f"p90 {f['p90_cv_pct']:.2f}%  max {f['max_cv_pct']:.2f}%  "
              f"({f['under_5pct']}/{f['kernels']} under 5%)")
    print(f"child cost: {json.dumps(result['child_cost_seconds'])}")
    print(f"verify ok: {verify_ok}; total {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
