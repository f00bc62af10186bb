"""The gauntlet over the standard library on a GPU, and how repeatable its numbers are.

    python scripts/gpu_gauntlet.py --out docs/bench-gauntlet-gpu.json --smoke --variance-runs 2

0. `--smoke`: before anything else, a few standard blueprints built as eager modules on the GPU,
   gatekept and profiled twice in this process; recorded (`smoke`), and with `--smoke-fatal`
   exits 3 unless every timing was a CUDA graph replay;
1. `esper library init` in a workspace (the 20 standard blueprints), unless --workspace names
   one that exists;
2. `esper forge --once --device cuda` builds the `fast` and `standard` kernels of every blueprint
   for one linear and one conv2d interface: several forge processes on the one workspace, as an
   operator would run them (claims keep them apart). `--no-forge` skips it;
3. the bench: `--benches` concurrent `esper bench --once --device cuda` processes on the one
   workspace and GPU (claims keep them apart; each gauntlet child profiles alone on the GPU under
   the per-GPU reader-writer lock, pipelines/urabrask/gpu_lock.py: start-up, loading and
   gatekeeping overlap, never a measurement). Past --bench-budget-s they are sent
   SIGTERM (the current gauntlet finishes or its claim is released): the rest stay
   PENDING_BENCHMARKING for the next invocation on the same --workspace;
4. variance across identical runs (HLD E.5 stage 1: < 5% for the key metrics). An identical run
   is what the bench does: a fresh sandboxed child per kernel (`run_gauntlet_sandboxed`, the
   bench's job and limits), never repeats inside one long-lived process. `--variance-runs N`
   sweeps N more times over the VALIDATED kernels (`--parallel` children at a time, under the
   same GPU lock; with `--variance-same-machine`, only kernels this invocation's bench judged);
   with the bench's own run that is N + 1 fresh processes per kernel. Per kernel and key metric:
   the spread (max - min over the median) and the CV (sample standard deviation / mean) across
   its runs; per pipeline, their median, 90th percentile and maximum over the kernels, and how
   many kernels are under 5%. The children report where their time went (`stage_seconds`),
   summarised as `child_cost_seconds`.

State (forge and bench summaries, variance runs) is kept beside the workspace, so a run split
over several invocations writes one --out; --out is rewritten after every phase and every 10
variance children. No new child is started past --budget-s (seconds since this invocation
began). Needs a CUDA device (`--device cpu` only to try the script out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from esper.contracts import KernelStatus
from esper.library import init_workspace
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.urabrask.bench import default_limits
from pipelines.urabrask.gauntlet import GauntletJob, hardware_context
from pipelines.urabrask.sandbox import run_gauntlet_sandboxed

KEY_METRICS = ("latency_ms_mean", "latency_ms_p50", "train_step_ms_mean", "train_step_ms_p50",
               "memory_mb_peak", "precision_drift_vs_fp64")
SMOKE_BLUEPRINTS = (("mlp_gelu_w32_dropout", "linear:512:128"), ("low_rank_r4", "linear:512:128"),
                    ("conv3x3_relu_w16", "conv2d:64:32:1"),
                    ("bottleneck_bn_relu_w8", "conv2d:64:32:1"))
ESPER = [sys.executable, "-c", "import sys; from esper_cli.main import main; sys.argv[0] = 'esper'; main()"]
CHILD_ESTIMATE_S = 15.0  # a gauntlet child's time before any was seen (~11 s on an H100)


def cv_pct(values: list[float]) -> float:
    """Sample standard deviation over the mean, in percent (0 for identical values)."""
    mean = statistics.fmean(values)
    return 100.0 * statistics.stdev(values) / mean if mean else 0.0


def spread_pct(values: list[float]) -> float:
    """(max - min) / median, in percent."""
    median = statistics.median(values)
    return 100.0 * (max(values) - min(values)) / median if median else 0.0


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


def smoke(args: argparse.Namespace) -> dict[str, object]:
    """A few standard blueprints as eager modules, gatekept and profiled twice here: every timing
    must be a CUDA graph replay."""
    from esper.blueprints import build, standard_library
    from esper.contracts import KernelInterface
    from pipelines.urabrask.gauntlet import gatekeep, profile

    library = {ir.name: ir for ir in standard_library()}
    out: dict[str, object] = {"ok": True, "kernels": []}
    for name, face in SMOKE_BLUEPRINTS:
        interface = KernelInterface.parse(face)
        module = build(library[name], interface, seed=0).to(args.device)
        form = "maps" if face.startswith("conv2d") else "rows"
        gatekeep(module, module, interface, form, torch.float32, args.device, seed=3)
        job = GauntletJob(kernel_id="smoke", device=args.device, round_seconds=args.round_seconds)
        for attempt in (1, 2):
            notes: dict[str, str] = {}
            started = time.monotonic()
            metrics, _ = profile(module, module, interface, form, torch.float32, job, notes=notes)
            ok = all(v == "cuda_graph_replay" for k, v in notes.items() if k.endswith("_timing"))
            out["ok"] = bool(out["ok"] and ok and not any(k.endswith("_failure") for k in notes))
            out["kernels"].append({"blueprint": name, "interface": face, "attempt": attempt,
                                   "notes": notes, "seconds": time.monotonic() - started,
                                   **{k: metrics[k] for k in (
                                       "latency_ms_mean", "latency_ms_p50", "latency_spread_pct",
                                       "train_step_ms_mean", "train_step_spread_pct")}})
            print(f"smoke {name:24} {face:15} latency {metrics['latency_ms_p50']:.5f} ms "
                  f"(spread {metrics['latency_spread_pct']:.2f}%) train "
                  f"{metrics['train_step_ms_p50']:.5f} ms (spread "
                  f"{metrics['train_step_spread_pct']:.2f}%) {notes}", flush=True)
    return out


def bench(ws: Workspace, args: argparse.Namespace, stop_at: float) -> dict[str, object]:
    """`--benches` concurrent `esper bench --once` processes; SIGTERM once `stop_at` passes."""
    started = time.monotonic()
    procs = [subprocess.Popen(
        [*ESPER, "--workspace", str(ws.root), "--json", "bench", "--once", "--device",
         args.device, "--worker-id", f"bench-gpu-{n}", "--round-seconds", str(args.round_seconds),
         "--grace-s", "25"], stdout=subprocess.PIPE, text=True) for n in range(args.benches)]
    outputs: list[str] = [""] * len(procs)

    def collect(n: int) -> None:
        outputs[n] = procs[n].communicate()[0]

    readers = [threading.Thread(target=collect, args=(n,)) for n in range(len(procs))]
    for reader in readers:
        reader.start()
    while any(p.poll() is None for p in procs):
        if time.monotonic() > stop_at:
            print("bench: budget reached, stopping the benches", flush=True)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            break
        time.sleep(1.0)
    for reader in readers:
        reader.join()
    summaries = [json.loads(o) if o.strip() else {"error": f"exit {p.returncode}"}
                 for o, p in zip(outputs, procs)]
    with Urza.open(ws) as urza:
        pending = len(urza.list_kernels(status=KernelStatus.PENDING_BENCHMARKING))
    seconds = time.monotonic() - started
    validated = sum(s.get("validated", 0) for s in summaries)
    rejected = sum(s.get("rejected", 0) for s in summaries)
    print(f"bench: {validated} validated, {rejected} rejected by {len(procs)} benches in "
          f"{seconds:.1f} s; {pending} left pending", flush=True)
    return {"seconds": seconds, "processes": len(procs), "round_seconds": args.round_seconds,
            "summaries": summaries, "validated": validated, "rejected": rejected,
            "left_pending": pending}


def variance_runs(ws: Workspace, args: argparse.Namespace, state: dict, stop_at: float,
                  save) -> None:
    """Sweeps of fresh sandboxed children over the VALIDATED kernels, as the bench runs them,
    `--parallel` at a time (the children take the GPU lock as the bench's do)."""
    with Urza.open(ws) as urza:
        validated = urza.list_kernels(status=KernelStatus.VALIDATED)
        if args.variance_same_machine:
            benched_now = {j["kernel_id"] for s in state["bench"][-1]["summaries"]
                           for j in s.get("jobs", [])}
            validated = [k for k in validated if k.id in benched_now]
    kernels = sorted(k.id for k in validated)
    state["variance_kernels"] = kernels
    runs: dict[str, list] = state.setdefault("variance_runs", {})
    scratch = Path(tempfile.mkdtemp(prefix="gauntlet-variance-"))
    todo = [(sweep, k) for sweep in range(args.variance_runs) for k in kernels
            if len(runs.get(k, [])) <= sweep]
    lock = threading.Lock()
    finished = [0]

    def one(item: tuple[int, str]) -> None:
        sweep, kernel_id = item
        if time.monotonic() + CHILD_ESTIMATE_S > stop_at:
            return
        job = GauntletJob(kernel_id=kernel_id, device=args.device,
                          round_seconds=args.round_seconds)
        outcome = run_gauntlet_sandboxed(ws.root, job, default_limits(), scratch_dir=scratch)
        result = outcome.result
        run = {"sweep": sweep + 1, "seconds": outcome.seconds, "peak_rss_mb": outcome.peak_rss_mb,
               "finished_s": time.monotonic() - stop_at + args.budget_s,
               "passed": bool(result is not None and result.passed),
               "reason": outcome.reason if result is None else result.reason,
               "metrics": result.metrics if result is not None else {},
               "baseline": result.baseline if result is not None else {},
               "hardware": result.hardware if result is not None else {},
               "stage_seconds": result.stage_seconds if result is not None else {}}
        with lock:
            runs.setdefault(kernel_id, []).append(run)
            finished[0] += 1
            if finished[0] % 10 == 0:
                save()
        latency = run["metrics"].get("latency_ms_p50", float("nan"))
        failed = "" if run["passed"] else f" FAILED: {run['reason']}"
        print(f"variance sweep {sweep + 1}: {kernel_id:38} p50 {latency:9.5f} ms "
              f"({outcome.seconds:.1f} s){failed}", flush=True)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(one, todo))
    if any(len(runs.get(k, [])) < args.variance_runs for k in kernels):
        print("variance: budget reached before every sweep finished", flush=True)


def rows_and_figure(ws: Workspace, state: dict) -> tuple[list[dict], dict, bool, list[str]]:
    bench_seconds = {j["kernel_id"]: j["seconds"] for b in state.get("bench", [])
                     for summary in b.get("summaries", []) for j in summary.get("jobs", [])}
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
                   "hardware": report.hardware_context if report else {},
                   "risk_score": report.risk_score if report else None,
                   "conf_level": report.conf_level if report else None,
                   "bench_child_seconds": bench_seconds.get(kernel.id),
                   "variance_runs": state.get("variance_runs", {}).get(kernel.id, [])}
            runs = ([row["bench"]] if row["bench"] else []) + [
                r["metrics"] for r in row["variance_runs"] if r["passed"]]
            row["runs_counted"] = len(runs)
            row["runs_timed_as_cuda_graph"] = sum(
                1 for r in runs if r.get("latency_cuda_graph") == 1.0
                and r.get("train_step_cuda_graph") == 1.0)
            if len(runs) >= 2:
                row["cv_pct_across_runs"] = {m: cv_pct([r[m] for r in runs]) for m in KEY_METRICS
                                             if all(m in r for r in runs)}
                row["spread_pct_across_runs"] = {m: spread_pct([r[m] for r in runs])
                                                 for m in KEY_METRICS
                                                 if all(m in r for r in runs)}
            rows.append(row)
        verify = urza.verify()
    figure: dict[str, dict] = {}
    for pipeline in ("fast", "standard", "all"):
        mine = [r for r in rows if pipeline in ("all", r["pipeline"])]
        for metric in KEY_METRICS:
            have = [r for r in mine if metric in r.get("cv_pct_across_runs", {})]
            if not have:
                continue
            cvs = [r["cv_pct_across_runs"][metric] for r in have]
            spreads = [r["spread_pct_across_runs"][metric] for r in have]
            counts = [r["runs_counted"] for r in have]
            worst = max(have, key=lambda r: r["spread_pct_across_runs"][metric])
            figure.setdefault(pipeline, {})[metric] = {
                "kernels": len(have), "runs_per_kernel_min": min(counts),
                "runs_per_kernel_max": max(counts),
                "median_cv_pct": statistics.median(cvs), "p90_cv_pct": percentile(cvs, 0.9),
                "max_cv_pct": max(cvs), "cv_under_5pct": sum(v < 5.0 for v in cvs),
                "median_spread_pct": statistics.median(spreads),
                "p90_spread_pct": percentile(spreads, 0.9), "max_spread_pct": max(spreads),
                "spread_under_5pct": sum(v < 5.0 for v in spreads),
                "worst_kernel": f"{worst['blueprint']} {worst['pipeline']} {worst['interface']}"}
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
            medians["after_profile"] = medians["child_total"] - sum(medians[s] for s in stages)
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
    parser.add_argument("--smoke", action="store_true",
                        help="first check CUDA graph timing on a few eager modules")
    parser.add_argument("--smoke-fatal", action="store_true",
                        help="exit 3 when the smoke check finds a timing that is no graph replay")
    parser.add_argument("--benches", type=int, default=6, help="concurrent bench processes")
    parser.add_argument("--parallel", type=int, default=6,
                        help="concurrent gauntlet children in the variance sweeps")
    parser.add_argument("--round-seconds", type=float, default=0.05,
                        help="timed work per repeat (the bench's --round-seconds)")
    parser.add_argument("--pipelines", default="fast,standard")
    parser.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bench-budget-s", type=float, default=None,
                        help="claim no new kernel past this many seconds (default: --budget-s)")
    parser.add_argument("--variance-runs", type=int, default=0,
                        help="sweeps of fresh sandboxed children over the VALIDATED kernels")
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

    def write_out() -> dict[str, object]:
        rows, figure, verify_ok, verify_problems = rows_and_figure(ws, state)
        within = {m: [row["bench"][m] for row in rows if m in row["bench"]]
                  for m in ("latency_cv_pct", "train_step_cv_pct")}
        result = {
            "environment": state["environment"], "invocations": state["invocations"],
            "interfaces": interfaces, "smoke": state.get("smoke"), "forge": state.get("forge"),
            "bench": state.get("bench", []),
            "variance_method": "each run a fresh sandboxed child per kernel "
                               "(run_gauntlet_sandboxed, the bench's GauntletJob and limits); "
                               "the bench's own run counts as the first; per kernel: spread = "
                               "(max - min) / median, CV = sample stdev / mean, across runs",
            "variance_kernels": state.get("variance_kernels"),
            "variance_across_runs": figure,
            "within_run_cv_pct_of_repeats": {
                m: {"median": statistics.median(v), "p90": percentile(v, 0.9), "max": max(v)}
                for m, v in within.items() if v},
            "child_cost_seconds": cost(rows),
            "verify_ok": verify_ok, "verify_problems": verify_problems, "kernels": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        return result

    def save() -> None:
        invocation["seconds"] = time.monotonic() - started
        state_path.write_text(json.dumps(state, indent=1, default=str))
        write_out()

    if args.smoke:
        try:
            state["smoke"] = smoke(args)
        except Exception as e:  # noqa: BLE001 - recorded; the gauntlet's own children still run
            state["smoke"] = {"ok": False, "error": repr(e)[:500]}
        save()
        if not state["smoke"]["ok"]:
            print(f"smoke: not every timing was a CUDA graph replay: {state['smoke']}",
                  flush=True)
            if args.smoke_fatal:
                sys.exit(3)
    if args.forge:
        state["forge"] = forge(ws, args, interfaces)
        save()
    if args.bench:
        stop_at = started + (args.bench_budget_s if args.bench_budget_s else args.budget_s)
        state.setdefault("bench", []).append(bench(ws, args, stop_at))
        save()
    if args.variance_runs:
        try:
            variance_runs(ws, args, state, started + args.budget_s, save)
        finally:
            save()
    save()
    result = json.loads(args.out.read_text())
    rows, figure = result["kernels"], result["variance_across_runs"]
    verify_ok = result["verify_ok"]
    for row in rows:
        spread = row.get("spread_pct_across_runs", {})
        print(f"{row['kernel']:38} {row['blueprint']:27} {row['status']:10} "
              f"{row['bench'].get('latency_ms_p50', float('nan')):9.5f} ms  runs "
              f"{row['runs_counted']} (graph {row['runs_timed_as_cuda_graph']})  spread p50 "
              f"{spread.get('latency_ms_p50', float('nan')):5.2f}% train "
              f"{spread.get('train_step_ms_p50', float('nan')):5.2f}%")
    for pipeline, metrics in figure.items():
        for metric, f in metrics.items():
            print(f"variance {pipeline:8} {metric:24} spread median {f['median_spread_pct']:.2f}%"
                  f" max {f['max_spread_pct']:.2f}% ({f['spread_under_5pct']}/{f['kernels']} "
                  f"< 5%); CV median {f['median_cv_pct']:.2f}% max {f['max_cv_pct']:.2f}% "
                  f"({f['cv_under_5pct']}/{f['kernels']} < 5%)")
    print(f"child cost: {json.dumps(result['child_cost_seconds'])}")
    print(f"verify ok: {verify_ok}; total {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
