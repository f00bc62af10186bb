"""Step times of `esper train` across germinations (DESIGN.md section 16: "no step during
germination slower than 1.2x the median step").

    python scripts/bench_train.py --device cpu --rounds 3 --out docs/bench-train.json
    python scripts/bench_train.py --device cuda --rounds 2 --out docs/bench-train.json

One temporary workspace, made the way a user makes one: the chosen standard blueprints are
registered, `esper forge`'s loop (`run_forge`, fast pipeline, sandboxed) compiles them for the
seeds' interface on this device, and `esper bench`'s loop (`Bench`, the real gauntlet) validates
them (`--validation signed` replaces the gauntlet by a bench-signed passing report, as the tests
do). Then the same run config (one model, one data order, one seed) trains three ways through
`run_training`, the function `esper train` calls:

  (a) none:     kasmina wraps no layer (`kasmina.targets: []`): the bare host;
  (b) dormant:  seeds wrapped, Tamiyo never germinates (`tamiyo.max_germinations=0`);
  (c) growing:  Tamiyo sees a plateau at every epoch after its warm-up and germinates up to
                `max_germinations` seeds, `max_concurrent` at a time, through the whole
                lifecycle; the last epochs are quiet again (every seed FOSSILIZED or CULLED).

What a step time is: the trainer's own `step_ms` (esper/tolaria/trainer.py, `_StepTimer`), from
just before the batch is moved to the device to just after `optimizer.step()` (forward, loss,
backward with the TRAINING seeds' isolated objectives in their hooks, `observe_loss`, clipping,
optimizer step, the loss accumulation). Not in it: fetching and collating the batch (the
DataLoader runs before the timer starts) and the epoch boundary (evaluation, Tamiyo, Kasmina's
transitions, the optimizer rebuild, metrics, checkpoint). On CPU it is `time.perf_counter` wall
time. On CUDA it is the GPU timeline between two events recorded on the stream at those points,
read once per epoch (no sync per step): the GPU time of the step's work, plus any time the GPU
sat idle inside the step waiting for the host to queue it (a host-side stall inside a step shows
up; one between steps does not). Beside it the script records, from the progress callback, the
host's wall time between consecutive steps (the whole per-step loop: data loading included, and
on CUDA the pace at which the host queues work, which runs ahead of the GPU) and each epoch
boundary's host time.

Warm-up: every statistic leaves out all of epoch 1 in every arm (first-use costs: allocator,
cuBLAS handles, Triton's compile of the dormant telemetry kernels); `--warmup-epochs` changes it.

"During germination" is the trainer's GROWING set: an epoch whose `stages_during` holds a seed in
GERMINATED, LOADING, TRAINING, GRAFTING, STABILIZATION, EVALUATING or FINE_TUNING; its steps are
compared with the median step of the growing arm's other (quiet) epochs, and with the dormant
arm's median (the same model with no seed ever active). Also reported: the first step after each
germination command and after each optimizer rebuild (both happen at an epoch boundary, so that
is the next epoch's first step), the slowest steps with the stages around them, and per stage.
`--rounds N` trains the three arms N times in turn in one process: the spread between rounds is
the machine's noise, and a later round finds what the first one paid for once per process
(Triton's compile of the blend kernels, torch.func's first vmap) already done.

Also recorded, with host times, to explain slow steps: each kernel load on Kasmina's loader
thread and each optimizer rebuild (by wrapping `VerifiedKernelSource.load` and the trainer's
`rebuild_optimizer`; nothing else changes), each full garbage collection, and per epoch the share
of the machine's CPU time that other processes took (/proc; on a shared machine another
session's tests slow every arm by 5-40x, which no code here controls). The statistics are given
over every epoch after the warm-up and, when some epochs were contended, again over the epochs in
which other processes took at most `--max-others` of the CPUs.

Prints a table and writes every raw number (each step's time) to --out, under the device type
(`{"cpu": ..., "cuda": ...}`; a run keeps the other device's entry); `--reanalyse` recomputes and
prints the statistics from that file without training. Needs what `esper train`
needs (torch, pydantic, PyYAML, safetensors, sqlite-utils, cryptography; triton on CUDA).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np
import torch

# Per device: a host whose steps are compute, not Python (an MLP on teacher-student regression,
# seeds on its square hidden layers), and the lifecycle lengths in steps. 16 steps an epoch.
SIZES: dict[str, dict[str, Any]] = {
    # 3 hidden 512 x 512 layers at batch 256: ~15-25 ms a step on 2 cores.
    "cpu": {"widths": [512, 512, 512, 512], "in_dim": 64, "out_dim": 8, "batch": 256,
            "steps_per_epoch": 16, "epochs": 22, "seeds_per_layer": 4},
    # 3 hidden 4096 x 4096 fp32 layers at batch 2048: ~0.6 TFLOP a step, GPU-bound on an H100.
    "cuda": {"widths": [4096, 4096, 4096, 4096], "in_dim": 64, "out_dim": 8, "batch": 2048,
             "steps_per_epoch": 16, "epochs": 22, "seeds_per_layer": 4},
}
BLUEPRINTS = ("mlp_gelu_w8", "low_rank_r4")  # forged and benched for the seeds' interface
TARGET = 1.2
ARMS = ("none", "dormant", "growing")


# --- the workspace: forge and bench, as a user runs them ------------------------------------

def build_workspace(root: Path, device: str, interface: str, validation: str) -> tuple[Any, dict]:
    """A workspace whose catalog holds BLUEPRINTS compiled by the forge's loop for `interface` on
    `device` and VALIDATED by the bench's loop (or by bench-signed reports)."""
    from esper import signing
    from esper.blueprints import standard_library
    from esper.contracts import (
        LATENCY_MS,
        MEMORY_MB,
        CompilationPipeline,
        KernelInterface,
        KernelStatus,
        UrabraskValidationReport,
    )
    from esper.library import register
    from esper.urza import Urza
    from esper.workspace import Workspace
    from pipelines.tezzeret.forge import ForgeOptions, run_forge
    from pipelines.urabrask.bench import Bench, BenchOptions

    ws = Workspace(root / "ws")
    ws.create()
    timings: dict[str, Any] = {}
    with Urza.open(ws) as urza:
        irs = [(ir, f"standard library: {ir.name}") for ir in standard_library() if ir.name in BLUEPRINTS]
        register(urza, irs, origin="library", actor="bench_train")
    started = time.perf_counter()
    forge = run_forge(ws, None, ForgeOptions(devices=(device,), interfaces=(KernelInterface.parse(interface),),
                                             pipelines=(CompilationPipeline.FAST,), idle_work=False),
                      once=True)
    timings["forge_seconds"] = time.perf_counter() - started
    timings["forge_summary"] = forge.to_jsonable()
    started = time.perf_counter()
    with Urza.open(ws) as urza:
        if validation == "bench":
            lines: list[str] = []
            summary = Bench(ws, urza, None, BenchOptions(device=device, worker_id="bench-train"),
                            progress=lines.append).run(once=True)
            timings["bench_lines"] = lines
            timings["bench_summary"] = summary.to_jsonable()
        else:
            for kernel in urza.list_kernels(status=KernelStatus.PENDING_BENCHMARKING):
                report = UrabraskValidationReport(
                    kernel_artifact_id=kernel.id, blueprint_id=kernel.blueprint_id,
                    passed_validation=True, benchmark_results={LATENCY_MS: 0.1, MEMORY_MB: 1.0},
                    risk_score=0.1)
                urza.apply_validation_report(signing.sign(report.to_json().encode(),
                                                          ws.private_key("bench"), "bench"),
                                             actor="bench_train")
        names = {b.id: b.name for b in urza.list_blueprints()}
        kernels = {k.id: {"blueprint": names[k.blueprint_id], "status": k.status.value,
                          "interface": str(k.interface), "target": k.target}
                   for k in urza.list_kernels()}
    timings["validation_seconds"] = time.perf_counter() - started
    timings["validation"] = validation
    if not any(k["status"] == KernelStatus.VALIDATED.value for k in kernels.values()):
        raise SystemExit(f"no kernel was VALIDATED for {interface} on {device}: {kernels}")
    return ws, {"kernels": kernels, **timings}


# --- the run config --------------------------------------------------------------------------

def base_config(device: str, sizes: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The one config the three arms share; `arm_config` changes only what selects the arm."""
    n_train = sizes["batch"] * sizes["steps_per_epoch"]
    steps = sizes["steps_per_epoch"]
    hidden = len(sizes["widths"])
    return {
        "name": "bench-train", "seed": 0, "device": device, "epochs": epochs,
        "model": {"name": "mlp", "kwargs": {"widths": sizes["widths"]}},
        "data": {"name": "teacher_student",
                 "kwargs": {"n_samples": n_train * 5 // 4, "in_dim": sizes["in_dim"],
                            "out_dim": sizes["out_dim"], "teacher_width": 256},
                 "batch_size": sizes["batch"], "eval_batch_size": n_train // 4, "val_fraction": 0.2},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "kasmina": {
            # the square hidden layers (layers.1 ...), not the input layer nor the head
            "include": [f"layers.{i}" for i in range(1, hidden)],
            "seeds_per_layer": sizes["seeds_per_layer"],
            # Stage lengths so that a graft goes from germination to FOSSILIZED in ~7 epochs.
            "training": {"min_steps": steps // 2, "ready_loss_ratio": 1.0},
            "grafting": {"ramp_length": steps},
            "stabilization_steps": steps // 2,
            "embargo_epochs": 2,
        },
        "tamiyo": {
            # min_delta larger than any improvement: a plateau at every epoch after the warm-up,
            # so Tamiyo germinates whenever a slot is free, until max_germinations.
            "plateau": {"warmup_epochs": 3, "patience": 1, "min_delta": 10.0},
            "max_concurrent": 2, "max_germinations": 4,
            "gates": {"keep_min_improvement": -1e9},  # keep every graft: all go to FOSSILIZED
        },
        # A checkpoint at the start and the end only: they run at the boundary, outside the step
        # times, but a 4096-wide model's AdamW state is ~600 MB a checkpoint.
        "checkpoints": {"every_epochs": epochs, "keep_last": 1},
        "telemetry": {"bus": False},
    }


def arm_config(base: dict[str, Any], arm: str) -> Any:
    from esper.tolaria.config import TrainConfig

    config = json.loads(json.dumps(base))
    if arm == "none":
        config["kasmina"].update(targets=[], include=[])  # no seeds
    elif arm == "dormant":
        config["tamiyo"]["max_germinations"] = 0
    config["name"] = f"bench-train-{arm}"
    return TrainConfig.from_mapping(config, source=f"bench_train:{arm}")


# --- one run ---------------------------------------------------------------------------------

@contextmanager
def recorded(rebuilds: list[dict[str, Any]], loads: list[dict[str, Any]],
             collections: list[dict[str, Any]], where: dict[str, int]) -> Iterator[None]:
    """For the block, record with host times (perf_counter seconds): each optimizer rebuild the
    trainer makes (the epoch whose boundary made it), each kernel load by the verifying loader (on
    Kasmina's loader thread), and each garbage collection. The first two by wrapping
    `esper.tolaria.trainer.rebuild_optimizer` and `VerifiedKernelSource.load`; nothing else changes."""
    from esper.tolaria import trainer
    from pipelines.tezzeret.loader import VerifiedKernelSource

    rebuild, load = trainer.rebuild_optimizer, VerifiedKernelSource.load

    def timed_rebuild(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return rebuild(*args, **kwargs)
        finally:
            rebuilds.append({"epoch": where["epoch"], "start": started, "end": time.perf_counter()})

    def timed_load(self: Any, kernel_artifact_id: str, device: Any) -> Any:
        started = time.perf_counter()
        try:
            return load(self, kernel_artifact_id, device)
        finally:
            loads.append({"kernel": kernel_artifact_id, "thread": threading.current_thread().name,
                          "start": started, "end": time.perf_counter()})

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append({"generation": info["generation"], "start": time.perf_counter()})
        elif collections and "end" not in collections[-1]:
            collections[-1]["end"] = time.perf_counter()

    trainer.rebuild_optimizer, VerifiedKernelSource.load = timed_rebuild, timed_load
    gc.callbacks.append(on_gc)
    try:
        yield
    finally:
        trainer.rebuild_optimizer, VerifiedKernelSource.load = rebuild, load
        gc.callbacks.remove(on_gc)


def run_arm(arm: str, config: Any, ws: Any) -> dict[str, Any]:
    """Train one arm; its records: metrics.jsonl lines, host times, germinations, rebuilds, kernel
    loads and garbage collections (host times relative to the run's start)."""
    from esper.tolaria.run import run_training
    from esper.urza import Urza

    # (kind, epoch, step, host seconds, the training thread's (on-CPU ns, run-queue ns) or None)
    events: list[tuple[str, int, int, float, tuple[int, int] | None]] = []
    where = {"epoch": 0}
    machine: dict[str, dict[str, float] | None] = {}
    allocator_start: dict[str, int] = {}
    last = [cpu_jiffies()]

    def progress(event: Any) -> None:
        now = time.perf_counter()
        if event.kind in ("start", "step", "epoch"):
            events.append((event.kind, event.epoch, event.step, now, thread_schedstat()))
            if event.kind == "step":
                where["epoch"] = event.epoch
        if event.kind == "start":
            allocator_start.update(allocator_counts())
        if event.kind in ("start", "epoch"):  # at the boundary, outside the step times
            current = cpu_jiffies()
            if event.kind == "epoch":
                machine[str(event.epoch)] = contention(last[0], current)
                if machine[str(event.epoch)] is not None:
                    machine[str(event.epoch)] |= allocator_counts()
            last[0] = current

    rebuilds: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    collections: list[dict[str, Any]] = []
    started = time.perf_counter()
    with recorded(rebuilds, loads, collections, where):
        result = run_training(config, workspace=ws, progress=progress)
    wall = time.perf_counter() - started
    with Urza.open(ws) as urza:
        decisions = [{"epoch": d.epoch, "action": d.action, "seed_id": d.seed_id,
                      "kernel_artifact_id": d.kernel_artifact_id}
                     for d in urza.list_decisions(run_id=result.run_id) if d.action != "wait"]
    summary = {k: v for k, v in result.summary.items() if k not in ("outputs", "notices")}
    for item in rebuilds + loads + collections:
        item["start"] -= started
        item["end"] = item.get("end", item["start"] + started) - started
    record = {"arm": arm, "run_id": result.run_id, "wall_seconds": wall, "summary": summary,
              "notices": result.history.notices, "epochs": result.history.epochs,
              "decisions": decisions, "rebuilds": rebuilds, "loads": loads,
              "gc": [c for c in collections if c["generation"] == 2 or c["end"] - c["start"] > 1e-3],
              "host": host_times(events, started), "machine_by_epoch": machine,
              "allocator_start": allocator_start, "lineage": [
                  {k: a.get(k) for k in ("seed_id", "kernel_artifact_id", "germinated_epoch",
                                         "fossilized_epoch")}
                  for a in result.history.lineage.get("adaptations", [])],
              "outcomes": summary.get("outcomes")}
    shutil.rmtree(result.run_dir, ignore_errors=True)  # checkpoints: hundreds of MB on CUDA
    return record


def cpu_jiffies() -> tuple[int, int, int, int] | None:
    """(steal, busy, total, this process) clock ticks from /proc (Linux). Over an epoch, busy
    minus this process's own ticks is the CPU time other processes took (another session's tests
    on a shared machine), and steal the time the hypervisor gave away: slow steps no code here
    controls."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return steal, busy, busy + idle + iowait + steal, int(mine[11]) + int(mine[12])


def thread_schedstat() -> tuple[int, int] | None:
    """The calling thread's time on a CPU and waiting in the run queue, ns (/proc schedstat,
    Linux). Over a step's host interval, the rest of the wall time is time the thread was off the
    CPU by itself (a blocking call, the GIL held by another thread) or stolen by the hypervisor
    (which a guest kernel with steal accounting leaves out of both)."""
    try:
        run, wait, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return None


def allocator_counts() -> dict[str, int]:
    """CUDA caching allocator counters so far: segments it took from the driver (cudaMalloc) and
    allocations it retried after freeing its cache (each one synchronizes the device)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    stats = torch.cuda.memory_stats()
    return {"cuda_segments": int(stats.get("segment.all.allocated", 0)),
            "cuda_alloc_retries": int(stats.get("num_alloc_retries", 0))}


def contention(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> dict[str, float] | None:
    """Shares of the machine's CPU time between two readings: stolen, and used by other processes."""
    if a is None or b is None or b[2] <= a[2]:
        return None
    total = b[2] - a[2]
    return {"steal": (b[0] - a[0]) / total,
            "others": max(0, (b[1] - a[1]) - (b[3] - a[3])) / total}


def host_times(events: list[tuple[str, int, int, float, tuple[int, int] | None]],
               origin: float) -> dict[str, Any]:
    """From the progress events: per epoch, each step's host interval (from the previous step's
    end, or the previous epoch's end, to this step's end; seconds from `origin`) and its length
    in ms, the training thread's ms on a CPU and in the run queue during it, and the boundary's
    host ms (last step to the epoch event)."""
    intervals: dict[int, list[tuple[float, float]]] = {}
    sched: dict[int, list[tuple[float, float] | None]] = {}
    boundary: dict[int, float] = {}
    previous = None
    for kind, epoch, _, t, stat in events:
        if kind == "step" and previous is not None:
            intervals.setdefault(epoch, []).append((previous[1] - origin, t - origin))
            sched.setdefault(epoch, []).append(
                None if stat is None or previous[2] is None
                else ((stat[0] - previous[2][0]) / 1e6, (stat[1] - previous[2][1]) / 1e6))
        if kind == "epoch" and previous is not None and previous[0] == "step":
            boundary[epoch] = (t - previous[1]) * 1e3
        previous = (kind, t, stat)
    return {"step_ms": {str(e): [(b - a) * 1e3 for a, b in v] for e, v in intervals.items()},
            "step_intervals": {str(e): v for e, v in intervals.items()},
            "step_cpu_wait_ms": {str(e): v for e, v in sched.items()},
            "boundary_ms": {str(e): v for e, v in boundary.items()}}


def overlaps(run: dict[str, Any], epoch: int, step: int) -> list[str]:
    """What ran on the host during step `step` (1-based) of `epoch`: a kernel load, a GC."""
    spans = run["host"]["step_intervals"].get(str(epoch), [])
    if step > len(spans):
        return []
    a, b = spans[step - 1]
    found = [f"host {(b - a) * 1e3:.1f} ms"]
    sched = run["host"].get("step_cpu_wait_ms", {}).get(str(epoch), [])
    if step <= len(sched) and sched[step - 1] is not None:
        cpu, wait = sched[step - 1]
        found[0] += f" ({cpu:.1f} on a CPU, {wait:.1f} in the run queue, {(b - a) * 1e3 - cpu - wait:.1f} off)"
    found += [f"load {x['kernel'][:12]} {(x['end'] - x['start']) * 1e3:.1f} ms"
              for x in run["loads"] if x["start"] < b and x["end"] > a]
    found += [f"gc gen{x['generation']} {(x['end'] - x['start']) * 1e3:.1f} ms"
              for x in run["gc"] if x["start"] < b and x["end"] > a]
    machine = run["machine_by_epoch"].get(str(epoch))
    if machine and machine["others"] >= 0.01:
        found.append(f"other processes {machine['others']:.0%} of the CPUs this epoch")
    if machine and machine["steal"] >= 0.01:
        found.append(f"steal {machine['steal']:.0%}")
    before = run["machine_by_epoch"].get(str(epoch - 1)) or run.get("allocator_start") or {}
    for key, what in (("cuda_segments", "cudaMalloc"), ("cuda_alloc_retries", "allocator retries")):
        if machine and key in machine and machine[key] > before.get(key, 0):
            found.append(f"{machine[key] - before.get(key, 0)} {what} this epoch")
    return found


# --- statistics ------------------------------------------------------------------------------

GROWING = ("GERMINATED", "LOADING", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING",
           "FINE_TUNING")


def dist(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


def growing(record: dict[str, Any]) -> bool:
    return any(s in GROWING for s in record["stages_during"])


def contended(run: dict[str, Any], epoch: int, max_others: float) -> bool:
    machine = run["machine_by_epoch"].get(str(epoch))
    return machine is not None and machine["others"] > max_others


def analyse(run: dict[str, Any], warmup: int, baseline: float | None,
            max_others: float | None = None) -> dict[str, Any]:
    """The run's distributions (epochs after the warm-up); for a growing run the target's ratios
    (its largest growing step against the dormant run's median, its own quiet median and its own
    median) and where its slowest steps are. `baseline`: the same round's dormant median (from the
    same selection of epochs). `max_others`: also leave out the epochs in which other processes
    took more than this share of the machine's CPUs."""
    epochs = [r for r in run["epochs"] if r["epoch"] > warmup
              and not (max_others is not None and contended(run, r["epoch"], max_others))]
    steps = [t for r in epochs for t in r["step_ms"]]
    host = run["host"]
    host_steps = [t for r in epochs for t in host["step_ms"].get(str(r["epoch"]), [])]
    # A stall shows as a step far above its own epoch's median; a seed's steady extra work does not.
    spikes = [max(r["step_ms"]) / statistics.median(r["step_ms"]) for r in epochs if r["step_ms"]]
    out: dict[str, Any] = {
        "epochs_used": [r["epoch"] for r in epochs],
        "steps": dist(steps), "host_steps": dist(host_steps),
        "first_step_of_epoch": dist([r["step_ms"][0] for r in epochs if r["step_ms"]]),
        "other_steps": dist([t for r in epochs for t in r["step_ms"][1:]]),
        "boundary_ms": dist([host["boundary_ms"][str(r["epoch"])] for r in epochs
                             if str(r["epoch"]) in host["boundary_ms"]]),
        "max_over_median": (max(steps) / statistics.median(steps)) if steps else None,
        "gc_gen2": gc_summary(run, [r["epoch"] for r in epochs]),
        "spike_epochs": [r["epoch"] for r in epochs if r["step_ms"]
                         and max(r["step_ms"]) > TARGET * statistics.median(r["step_ms"])],
        "epoch_max_over_epoch_median": dist(spikes),
        "others_cpu_max": max((m["others"] for r in epochs
                               if (m := run["machine_by_epoch"].get(str(r["epoch"])))), default=None),
        "steal_max": max((m["steal"] for r in epochs
                          if (m := run["machine_by_epoch"].get(str(r["epoch"])))), default=None),
    }
    grow = [r for r in epochs if growing(r)]
    if not grow:
        return out
    quiet = [r for r in epochs if not growing(r)]
    grow_steps = [t for r in grow for t in r["step_ms"]]
    quiet_steps = [t for r in quiet for t in r["step_ms"]]
    quiet_median = statistics.median(quiet_steps) if quiet_steps else None
    worst = max(((t, r["epoch"], i + 1, r["stages_during"]) for r in grow
                 for i, t in enumerate(r["step_ms"])), key=lambda w: w[0])

    def ratio(value: float, to: float | None) -> float | None:
        return value / to if to else None

    slowest = sorted(((t, r["epoch"], i + 1, r["stages_during"]) for r in epochs
                      for i, t in enumerate(r["step_ms"])), key=lambda w: -w[0])[:8]
    germinations = sorted({d["epoch"] for d in run["decisions"] if d["action"] == "germinate"})
    by_epoch = {r["epoch"]: r for r in run["epochs"]}

    def after(boundaries: list[int]) -> list[dict[str, Any]]:
        rows = []
        for e in boundaries:
            nxt = by_epoch.get(e + 1)
            if nxt is None or not nxt["step_ms"]:
                continue
            rows.append({"boundary_epoch": e, "first_step_ms": nxt["step_ms"][0],
                         "epoch_median_ms": statistics.median(nxt["step_ms"]),
                         "epoch_max_ms": max(nxt["step_ms"]),
                         "first_vs_quiet_median": ratio(nxt["step_ms"][0], quiet_median),
                         "first_vs_dormant_median": ratio(nxt["step_ms"][0], baseline),
                         "stages_during": nxt["stages_during"]})
        return rows

    loaded = [t for r in grow for i, t in enumerate(r["step_ms"])
              if any(o.startswith("load") for o in overlaps(run, r["epoch"], i + 1))]
    unloaded = [t for r in grow for i, t in enumerate(r["step_ms"])
                if not any(o.startswith("load") for o in overlaps(run, r["epoch"], i + 1))]
    per_stage = {}
    for stage in GROWING:
        values = [t for r in grow if stage in r["stages_during"] for t in r["step_ms"]]
        if values:
            median = statistics.median(values)
            per_stage[stage] = dist(values) | {
                "median_vs_dormant_median": ratio(median, baseline),
                "max_vs_stage_median": ratio(max(values), median),
                "max_vs_dormant_median": ratio(max(values), baseline),
                "largest_epoch_spike": max(max(r["step_ms"]) / statistics.median(r["step_ms"])
                                           for r in grow if stage in r["stages_during"])}
    spike = max(((max(r["step_ms"]) / statistics.median(r["step_ms"]), r["epoch"],
                  r["step_ms"].index(max(r["step_ms"])) + 1, r["stages_during"]) for r in grow),
                key=lambda w: w[0])
    out["growth"] = {
        "growing_epochs": [r["epoch"] for r in grow], "quiet_epochs": [r["epoch"] for r in quiet],
        "growing_steps": dist(grow_steps), "quiet_steps": dist(quiet_steps),
        "max_growing_ms": worst[0],
        "max_growing_at": {"epoch": worst[1], "step": worst[2], "stages_during": worst[3]},
        "quiet_median_ms": quiet_median, "dormant_median_ms": baseline,
        "run_median_ms": statistics.median(steps),
        "ratio_vs_dormant_median": ratio(worst[0], baseline),
        "ratio_vs_quiet_median": ratio(worst[0], quiet_median),
        "ratio_vs_run_median": ratio(worst[0], statistics.median(steps)),
        "growing_median_vs_dormant_median": ratio(statistics.median(grow_steps), baseline),
        "growing_p99_vs_dormant_median": ratio(float(np.percentile(grow_steps, 99)), baseline),
        "growing_epoch_max_over_epoch_median": dist(
            [max(r["step_ms"]) / statistics.median(r["step_ms"]) for r in grow]),
        "largest_spike_at": {"ratio": spike[0], "epoch": spike[1], "step": spike[2],
                             "stages_during": spike[3], "overlaps": overlaps(run, spike[1], spike[2])},
        "germination_epochs": germinations,
        "after_germination": after(germinations),
        "after_rebuild": after(sorted({b["epoch"] for b in run["rebuilds"]})),
        "rebuild_ms": [(b["end"] - b["start"]) * 1e3 for b in run["rebuilds"]],
        "load_ms": [(x["end"] - x["start"]) * 1e3 for x in run["loads"]],
        "steps_overlapping_a_load": dist(loaded),
        "steps_not_overlapping_a_load_growing": dist(unloaded),
        "per_stage": per_stage,
        "slowest": [{"ms": t, "epoch": e, "step": i, "stages_during": st,
                     "overlaps": overlaps(run, e, i)} for t, e, i, st in slowest],
    }
    return out


def gc_summary(run: dict[str, Any], epochs: list[int]) -> dict[str, Any]:
    """Full (generation 2) garbage collections during the given epochs: how long, and how many
    fell inside a step's host interval (mostly in the DataLoader's collation, before the step's
    timer starts: they stall the loop but are not in step_ms)."""
    spans = [(a, b) for e in epochs for a, b in run["host"]["step_intervals"].get(str(e), [])]
    if not spans:
        return {"n": 0}
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    full = [g for g in run["gc"] if g["generation"] == 2 and g["start"] < last and g["end"] > first]
    inside = [g for g in full if any(g["start"] < b and g["end"] > a for a, b in spans)]
    ms = [(g["end"] - g["start"]) * 1e3 for g in full]
    return {"n": len(full), "in_step_intervals": len(inside), "median_ms": statistics.median(ms) if ms else None,
            "max_ms": max(ms, default=None)}


def verdict(raw: dict[str, Any], key: str = "analysis") -> dict[str, Any]:
    """The target, per round, read two ways; both are reported, neither replaces the other.

    - as written ("no step during germination slower than 1.2x the median step"): the largest
      step while a seed grows over the dormant run's median step (the same model and data with
      no seed ever active). It counts a growing seed's steady extra work (on CPU 13-38% of a step)
      as well as any stall.
    - stall: the largest step of a growing epoch over the median of that epoch's steps. An epoch
      is one set of stages (transitions happen at boundaries), so this is a spike above the steps
      around it: what a compile, a load or a collection inside a step makes. The dormant and
      bare runs' same figure is the machine's floor for it.

    `key`: "analysis" (every epoch after the warm-up) or "analysis_uncontended"."""
    rows = []
    floors: dict[str, float | None] = {}
    for name, run in raw["runs"].items():
        arm, round_ = name.split("/")
        if arm in ("none", "dormant"):
            floors[f"{arm}/{round_}"] = run[key]["epoch_max_over_epoch_median"].get("max")
        g = run[key].get("growth")
        if g is not None:
            rows.append({"run": name, "ratio_vs_dormant_median": g["ratio_vs_dormant_median"],
                         "ratio_vs_quiet_median": g["ratio_vs_quiet_median"],
                         "ratio_vs_run_median": g["ratio_vs_run_median"],
                         "growing_median_vs_dormant_median": g["growing_median_vs_dormant_median"],
                         "epoch_spike_growing_max": g["growing_epoch_max_over_epoch_median"].get("max"),
                         "dormant_epoch_spike_max": floors.get(f"dormant/{round_}"),
                         "none_epoch_spike_max": floors.get(f"none/{round_}")})
    worst = max((r["ratio_vs_dormant_median"] or float("inf") for r in rows), default=None)
    worst_spike = max((r["epoch_spike_growing_max"] or float("inf") for r in rows), default=None)
    return {"target": TARGET, "epochs": key, "rounds": rows,
            "worst_ratio_vs_dormant_median": worst, "met": worst is not None and worst <= TARGET,
            "worst_stall_ratio": worst_spike,
            "stall_met": worst_spike is not None and worst_spike <= TARGET}


# --- report ----------------------------------------------------------------------------------

def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "numpy": np.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "date": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in
                          Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    try:
        root = Path(__file__).resolve().parents[1]
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                           text=True, check=True).stdout.strip()
        env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, check=False,
                                               capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def gc2(g: dict[str, Any]) -> str:
    return f"{g['n']}({g['in_step_intervals']}) {g['max_ms']:.0f}" if g.get("n") else "0"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(raw: dict[str, Any], key: str = "analysis", detail: bool = True) -> None:
    env = raw["environment"]
    where = env.get("gpu") or env.get("cpu")
    which = ("every epoch after the warm-up" if key == "analysis" else
             f"epochs after the warm-up in which other processes took <= {raw['max_others']:.0%} "
             "of the CPUs")
    print(f"\nesper train step times on {where} (torch {env['torch']}"
          + (f", triton {env.get('triton')}" if "triton" in env else "")
          + f"), ms; {raw['sizes']['epochs']} epochs of {raw['sizes']['steps_per_epoch']} steps, "
          f"{raw['warmup_epochs']} warm-up; {which}")
    print(f"  {'run':<11} {'steps':>5} {'median':>8} {'p90':>8} {'p99':>8} {'max':>8} {'max/med':>7} "
          f"{'spike':>6} {'1st/ep':>7} {'host':>7} {'hostmax':>7} {'boundary':>8} {'gc2':>9} {'others':>6}")
    for name, run in raw["runs"].items():
        a = run[key]
        s = a["steps"]
        if not s["n"]:
            print(f"  {name:<11}     0")
            continue
        print(f"  {name:<11} {s['n']:>5} {fmt(s['median']):>8} {fmt(s['p90']):>8} {fmt(s['p99']):>8} "
              f"{fmt(s['max']):>8} {fmt(a['max_over_median']):>7} "
              f"{fmt(a['epoch_max_over_epoch_median'].get('max')):>6} "
              f"{fmt(a['first_step_of_epoch'].get('median')):>7} {fmt(a['host_steps'].get('median')):>7} "
              f"{fmt(a['host_steps'].get('max'), 1):>7} {fmt(a['boundary_ms'].get('median'), 1):>8} "
              f"{gc2(a['gc_gen2']):>9} "
              f"{'-' if a['others_cpu_max'] is None else format(a['others_cpu_max'], '.0%'):>6}")
    if detail:
        print("  (spike: the largest epoch max / epoch median; 1st/ep: median first step of an epoch; "
              "host, hostmax: median and largest host ms between steps (data loading included);\n"
              "   boundary: median host ms of an epoch boundary; gc2: full garbage collections, how many "
              "(in a step's host interval) and the longest ms;\n   others: the largest share of the machine's CPU time that other processes took in one "
              "epoch)")
    for name, run in raw["runs"].items():
        g = run[key].get("growth")
        if g is None:
            continue
        at = g["max_growing_at"]
        met = (g["ratio_vs_dormant_median"] or 99) <= TARGET
        print(f"\n  {name}: largest step while growing {fmt(g['max_growing_ms'])} ms (epoch {at['epoch']} "
              f"step {at['step']}, {at['stages_during']}): {fmt(g['ratio_vs_dormant_median'])}x the "
              f"dormant median {fmt(g['dormant_median_ms'])} ms (target <= {TARGET}x: "
              f"{'met' if met else 'MISSED'}); {fmt(g['ratio_vs_quiet_median'])}x the quiet median "
              f"{fmt(g['quiet_median_ms'])}; {fmt(g['ratio_vs_run_median'])}x the run's median")
        print(f"    growing steps: median {fmt(g['growing_steps']['median'])} "
              f"({fmt(g['growing_median_vs_dormant_median'])}x dormant), p99 "
              f"{fmt(g['growing_steps']['p99'])} ({fmt(g['growing_p99_vs_dormant_median'])}x); "
              f"largest spike in a growing epoch {fmt(g['growing_epoch_max_over_epoch_median']['max'])}x "
              f"its median")
        if not detail:
            continue
        print(f"    germinations at the boundaries of epochs {g['germination_epochs']}; outcomes "
              f"{run['outcomes']}; quiet epochs {g['quiet_epochs']}")
        sp = g["largest_spike_at"]
        print(f"    largest spike in a growing epoch: {fmt(sp['ratio'])}x at e{sp['epoch']}s{sp['step']} "
              f"({','.join(sp['stages_during'])})" + (f" [{'; '.join(sp['overlaps'])}]" if sp["overlaps"] else ""))
        print("      per stage (epochs with a seed in it): steps, median (x dormant median), max, "
              "max / the stage's median, max / dormant median, largest epoch max / epoch median")
        for stage, d in g["per_stage"].items():
            print(f"      {stage:<13} {d['n']:>4}  {fmt(d['median']):>8} ({fmt(d['median_vs_dormant_median'])}x)"
                  f"  {fmt(d['max']):>8}  {fmt(d['max_vs_stage_median']):>5}x  "
                  f"{fmt(d['max_vs_dormant_median']):>5}x  {fmt(d['largest_epoch_spike']):>5}x")
        for label, rows in (("after germination", g["after_germination"]),
                            ("after optimizer rebuild", g["after_rebuild"])):
            text = ", ".join(f"e{r['boundary_epoch'] + 1} {fmt(r['first_step_ms'])} "
                             f"({fmt(r['first_vs_dormant_median'])}x)" for r in rows)
            print(f"    first step {label}: {text or '-'}")
        print("    slowest steps: " + "; ".join(
            f"{fmt(w['ms'])} e{w['epoch']}s{w['step']} {','.join(w['stages_during']) or 'quiet'}"
            + (f" [{'; '.join(w['overlaps'])}]" if w["overlaps"] else "")
            for w in g["slowest"][:5]))
        print(f"    optimizer rebuilds (host ms, at the boundary): "
              f"{', '.join(fmt(m) for m in g['rebuild_ms'])}; kernel loads (loader thread, ms): "
              f"{', '.join(fmt(m) for m in g['load_ms'])}")
        ol, nl = g["steps_overlapping_a_load"], g["steps_not_overlapping_a_load_growing"]
        print(f"    growing steps overlapping a kernel load: {ol['n']}, median {fmt(ol.get('median'))} max "
              f"{fmt(ol.get('max'))}; the others: median {fmt(nl.get('median'))} max {fmt(nl.get('max'))}")
    v = raw.get("verdict", {}).get(key)
    if v:
        print(f"\n  target as written, <= {TARGET}x (largest growing step / dormant median): "
              + ", ".join(f"{r['run']} {fmt(r['ratio_vs_dormant_median'])}x" for r in v["rounds"])
              + f" -> {'met' if v['met'] else 'MISSED'}")
        print(f"  stall, <= {TARGET}x (largest step of a growing epoch / that epoch's median): "
              + ", ".join(f"{r['run']} {fmt(r['epoch_spike_growing_max'])}x (dormant "
                          f"{fmt(r['dormant_epoch_spike_max'])}x, none {fmt(r['none_epoch_spike_max'])}x)"
                          for r in v["rounds"])
              + f" -> {'met' if v['stall_met'] else 'MISSED'}")


def write(path: Path, key: str, raw: dict[str, Any]) -> None:
    """`path` holds one entry per device type ({"cpu": ..., "cuda": ...}): this run replaces its
    own device's entry and keeps the others."""
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) and set(data) <= {"cpu", "cuda"} else {}
    except (OSError, ValueError):
        data = {}
    data[key] = raw
    path.write_text(json.dumps(_rounded(data), separators=(",", ":")) + "\n")


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals (0.1 us in ms, 0.1 ms in s): the raw file stays a few hundred KB."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def analyse_runs(raw: dict[str, Any]) -> None:
    """(Re)compute every run's statistics from its raw records, and the verdicts: each run against
    the dormant run of its own round."""
    baseline: dict[str, float | None] = {}
    for name, run in raw["runs"].items():
        arm = name.split("/")[0]
        if arm == ARMS[0]:
            baseline = {}
        run["analysis"] = analyse(run, raw["warmup_epochs"], baseline.get("analysis"))
        run["analysis_uncontended"] = analyse(run, raw["warmup_epochs"],
                                              baseline.get("analysis_uncontended"), raw["max_others"])
        if arm == "dormant":
            baseline = {key: run[key]["steps"].get("median")
                        for key in ("analysis", "analysis_uncontended")}
    raw["verdict"] = {key: verdict(raw, key) for key in ("analysis", "analysis_uncontended")}


def report(raw: dict[str, Any]) -> None:
    print_table(raw)
    if any(r["analysis_uncontended"]["epochs_used"] != r["analysis"]["epochs_used"]
           for r in raw["runs"].values()):
        print_table(raw, "analysis_uncontended", detail=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-train.json"))
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default per device)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="train the three arms this many times, in turn (none, dormant, growing, "
                             "none, ...): the spread between rounds is the machine's noise, and later "
                             "rounds find Triton's kernels already compiled")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="leading epochs left out of every statistic, in every run")
    parser.add_argument("--validation", choices=["bench", "signed"], default="bench",
                        help="bench: the real gauntlet validates the kernels; signed: a bench-signed "
                             "passing report, as the tests do (faster)")
    parser.add_argument("--max-others", type=float, default=0.1,
                        help="besides the statistics over every epoch, report them over the epochs "
                             "in which other processes took at most this share of the machine's CPUs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own choice)")
    parser.add_argument("--reanalyse", action="store_true",
                        help="train nothing: recompute the statistics of --device's entry in --out from "
                             "its raw records (with --warmup-epochs and --max-others) and print them")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args()
    if args.reanalyse:
        raw = json.loads(args.out.read_text())[args.device]
        raw["warmup_epochs"], raw["max_others"] = args.warmup_epochs, args.max_others
        analyse_runs(raw)
        report(raw)
        write(args.out, args.device, raw)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = dict(SIZES[device.type])
    epochs = args.epochs or sizes["epochs"]
    sizes["epochs"] = epochs
    interface = f"linear:{sizes['widths'][1]}:{sizes['widths'][1] // sizes['seeds_per_layer']}"
    raw: dict[str, Any] = {"environment": environment(device), "command": sys.argv,
                           "sizes": sizes, "interface": interface, "blueprints": BLUEPRINTS,
                           "warmup_epochs": args.warmup_epochs, "max_others": args.max_others,
                           "target": TARGET, "rounds": args.rounds, "runs": {}}
    root = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))  # short: a Unix socket may live here
    try:
        print(f"workspace {root}: forging {', '.join(BLUEPRINTS)} for {interface} on {device.type}, "
              f"validation: {args.validation}", flush=True)
        ws, raw["workspace"] = build_workspace(root, device.type, interface, args.validation)
        print(f"  forge {raw['workspace']['forge_seconds']:.1f} s, validation "
              f"{raw['workspace']['validation_seconds']:.1f} s: "
              + ", ".join(f"{k['blueprint']} {k['status']}" for k in raw["workspace"]["kernels"].values()),
              flush=True)
        base = base_config(args.device, sizes, epochs)
        raw["config"] = base
        for round_ in range(1, args.rounds + 1):
            for arm in ARMS:
                name = f"{arm}/{round_}"
                started = time.perf_counter()
                raw["runs"][name] = run = run_arm(name, arm_config(base, arm), ws)
                steps = [t for r in run["epochs"][args.warmup_epochs:] for t in r["step_ms"]]
                print(f"  {name}: {len(run['epochs'])} epochs in {time.perf_counter() - started:.1f} s, "
                      f"median step {fmt(statistics.median(steps) if steps else None)} ms, max "
                      f"{fmt(max(steps, default=None))} ms, outcomes {run['outcomes']}", flush=True)
                write(args.out, device.type, raw)  # raw records so far, in case the run is cut short
        analyse_runs(raw)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(raw)
    write(args.out, device.type, raw)
    print(f"\nraw numbers: {args.out} [{device.type!r}]")


if __name__ == "__main__":
    main()
