"""Host time of one training step with seeds in each stage (issue 6: host-bound steps while a seed
is GRAFTING and TRAINING; docs/bench-train.md).

    python scripts/bench_seed_step.py                      # CPU, width 16, batch 8: host overhead
    python scripts/bench_seed_step.py --device cuda        # bench_train's H100 sizes
    python scripts/bench_seed_step.py --device cuda --width 16 --batch 8 --in-dim 16

A step is what Tolaria's `_run_epoch` runs per batch: the batch moved to the device,
`zero_grad`, forward, loss, backward (a TRAINING seed's isolated objective runs in its output
hook), `observe_loss` on every Kasmina layer, the optimizer step (AdamW over
`optimizer_parameters`) and the loss accumulation. The model is Tolaria's `mlp` (`layers.0-3`
and a head); `layers.1-3` are wrapped with `--seeds` seeds each, as in scripts/bench_train.py.
Seeds reach their stage through `KasminaLayer.transition`, the lifecycle the tests drive, with
kernels built from the standard library by `BlueprintKernelSource` (no workspace); a GRAFTING
seed sits mid-ramp (alpha 0.5, a ramp too long to finish in the run).

Cases: `none` (no wrap), `dormant`, `training` (one seed TRAINING), `grafting` (one seed
GRAFTING), `train+graft` (one of each in `layers.1`), `train+graft/2` (TRAINING in `layers.1`,
GRAFTING in `layers.2`). Each case keeps its own model; `--repeats` rounds run every case in
turn for `--steps` steps (rounds interleave the cases, so machine noise hits them alike), after
`--warmup` steps per case. Printed per case: the median over all rounds' steps of the host time
(perf_counter around the step; on CUDA no sync inside a round, so it is the time to queue the
work unless the launch queue is full and the host waits for the GPU; `--sync-steps` waits for
the GPU before each step, untimed, so that it is the queuing alone), its 90th percentile and its extra over `dormant`; the
training thread's CPU time per step (thread_time: on a shared machine, unlike the wall time,
not lengthened by other processes taking the cores); on CUDA the GPU time between
two events around each step (read once per round), and the host time per step of a whole round
(synchronized at both ends: whichever of host and GPU is slower); and the ATen ops a step
dispatches and its Python function calls (each a mean over 16 extra steps, a dormant layer's
telemetry period, so not in the timings: machine-independent measures of host work, for A/B
runs on a noisy machine).
`--profile CASE` prints that case's cProfile instead. Needs torch (triton on CUDA) and esper.
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kasmina
from esper.blueprints import standard_library
from esper.contracts import GraftingStrategy
from esper.contracts import SeedLifecycle as S
from esper.tolaria.config import OptimizerConfig
from esper.tolaria.models import MLP
from esper.tolaria.optim import build_optimizer

CASES = ("none", "dormant", "training", "grafting", "train+graft", "train+graft/2")
# What each case puts where: (layer index among the wrapped layers, seed, stage).
PLACEMENT: dict[str, list[tuple[int, int, S]]] = {
    "none": [], "dormant": [],
    "training": [(0, 0, S.TRAINING)],
    "grafting": [(0, 1, S.GRAFTING)],
    "train+graft": [(0, 0, S.TRAINING), (0, 1, S.GRAFTING)],
    "train+graft/2": [(0, 0, S.TRAINING), (1, 1, S.GRAFTING)],
}
PATH = {S.TRAINING: [S.TRAINING], S.GRAFTING: [S.TRAINING, S.GRAFTING]}
LIBRARY = {ir.name: ir for ir in standard_library()}
# cpu: compute negligible, the step is host overhead; cuda: scripts/bench_train.py's H100 sizes
# (4096-wide fp32 layers at batch 2048: a GPU-bound step with dormant seeds).
COUNTED_STEPS = 16  # ops and calls are counted over one period of the dormant telemetry (every 16)
DEFAULT_SIZES = {"cpu": {"width": 16, "in_dim": 16, "batch": 8},
                 "cuda": {"width": 4096, "in_dim": 64, "batch": 2048}}


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block (backward's included), and higher-order
    ops (a Triton launch through wrap_triton's tracing path is one)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class Case:
    """One model with seeds placed for `name`, its optimizer and its batch."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        self.name = name
        torch.manual_seed(0)
        widths = [args.width] * 4
        model = MLP((args.in_dim,), args.out_dim, widths)
        if name != "none":
            config = {"include": ["layers.1", "layers.2", "layers.3"], "seeds_per_layer": args.seeds,
                      "grafting": {"ramp_length": 10**9}}
            source = kasmina.BlueprintKernelSource()
            model, _ = kasmina.wrap(model, config, kernel_source=source)
            layers = kasmina.layers(model)
            for index, seed, stage in PLACEMENT[name]:
                layer = layers[index]
                kernel = source.add(LIBRARY[args.blueprint], layer.seed_interface)
                layer.transition(seed, S.GERMINATED, kernel_artifact_id=kernel,
                                 strategy=GraftingStrategy.FIXED_RAMP)
                layer.transition(seed, S.LOADING)
                for step in PATH[stage]:
                    layer.transition(seed, step)
                if stage is S.GRAFTING:
                    layer.state.alpha[seed] = 0.5
        self.model = model.to(device)
        self.layers = kasmina.layers(self.model)
        self.optimizer = build_optimizer(self.model, OptimizerConfig(name="adamw", lr=1e-3))
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(args.batch, args.in_dim, generator=generator)
        self.y = torch.randn(args.batch, args.out_dim, generator=generator)
        if device.type == "cuda":
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.device = device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.model.train()

    def step(self) -> None:
        """One step of Tolaria's `_run_epoch` loop (no clipping, no injected fault)."""
        x = self.x.to(self.device, non_blocking=True)
        y = self.y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.model(x), y)
        loss.backward()
        for layer in self.layers:
            layer.observe_loss(loss)
        self.optimizer.step()
        self.loss_sum += loss.detach()

    def stages(self) -> str:
        return " ".join(f"{layer.layer_name}:{s.value[0]}" for layer in self.layers
                        for s in layer.stages if s is not S.DORMANT) or "-"


def run_round(case: Case, steps: int, cuda: bool, sync_steps: bool = False
              ) -> tuple[list[float], list[float], list[float], float]:
    """`steps` steps: host ms of each, the training thread's CPU ms of each, GPU ms of each
    (CUDA), and host ms per step of the round. `sync_steps`: wait for the GPU before each step
    (outside its timing), so that a step's host time is its queuing alone, never a wait for a
    full launch queue."""
    host: list[float] = []
    cpu: list[float] = []
    events = []
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        if sync_steps:
            torch.cuda.synchronize()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0, c0 = time.perf_counter(), time.thread_time()
        case.step()
        host.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
        if cuda:
            end.record()
            events.append((start, end))
    if cuda:
        torch.cuda.synchronize()  # sync: once per round
    round_ms = (time.perf_counter() - began) * 1e3 / steps  # with sync_steps: host + GPU, serialized
    return host, cpu, [a.elapsed_time(b) for a, b in events], round_ms


def count_ops(case: Case) -> float:
    with _OpCounter() as counter:
        for _ in range(COUNTED_STEPS):
            case.step()
    return counter.ops / COUNTED_STEPS


def count_calls(case: Case) -> float:
    """Python and builtin function calls of one step on this thread (on CUDA the backward's
    hooks run on autograd's device thread and are not counted)."""
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        for _ in range(COUNTED_STEPS):
            case.step()
    finally:
        sys.setprofile(None)
    return calls / COUNTED_STEPS


def profile(case: Case, steps: int, cuda: bool, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_round(case, steps, cuda)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, help="hidden width (default: cpu 16, cuda 4096)")
    parser.add_argument("--in-dim", type=int, help="input width (default: cpu 16, cuda 64)")
    parser.add_argument("--out-dim", type=int, default=8)
    parser.add_argument("--batch", type=int, help="batch size (default: cpu 8, cuda 2048)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per wrapped layer")
    parser.add_argument("--blueprint", default="low_rank_r4", help="standard library blueprint")
    parser.add_argument("--steps", type=int, default=50, help="steps per case per round")
    parser.add_argument("--repeats", type=int, default=6, help="rounds over all cases")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per case first")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sync-steps", action="store_true",
                        help="CUDA: synchronize before each step (untimed): host ms is queuing alone")
    parser.add_argument("--profile", choices=CASES, help="print this case's cProfile and exit")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    for name, value in DEFAULT_SIZES["cuda" if cuda else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    names = [args.profile] if args.profile else args.cases.split(",")
    cases: dict[str, Case] = {name: Case(name, args, device) for name in names}
    for case in cases.values():
        for _ in range(args.warmup):
            case.step()
    if args.profile:
        profile(cases[args.profile], args.steps * args.repeats, cuda, args.top)
        return
    host: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gpu: dict[str, list[float]] = {n: [] for n in names}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name, case in cases.items():
            h, c, g, r = run_round(case, args.steps, cuda, args.sync_steps)
            host[name] += h
            cpu[name] += c
            gpu[name] += g
            rounds[name].append(r)
    ops = {name: count_ops(case) for name, case in cases.items()}
    calls = {name: count_calls(case) for name, case in cases.items()}

    machine = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()}"
    print(f"# {machine}, torch {torch.__version__}, width {args.width}, batch {args.batch}, "
          f"{args.seeds} seeds/layer, {args.blueprint}; {args.repeats} rounds x {args.steps} steps "
          f"per case, interleaved; medians{'; synchronized before each step' if args.sync_steps else ''}")
    base = statistics.median(host["dormant"]) if "dormant" in host else None
    header = f"{'case':<14} {'host ms':>8} {'p90':>7} {'vs dormant':>10} {'cpu ms':>7} {'ops':>6} {'calls':>7}"
    if cuda:
        header += f" {'GPU ms':>7} {'round ms':>8}"
    print(header + "  stages")
    for name, case in cases.items():
        median = statistics.median(host[name])
        p90 = statistics.quantiles(host[name], n=10)[-1]
        extra = f"{median - base:+.3f}" if base is not None else "-"
        line = (f"{name:<14} {median:8.3f} {p90:7.3f} {extra:>10} {statistics.median(cpu[name]):7.3f} "
                f"{ops[name]:6.1f} {calls[name]:7.1f}")
        if cuda:
            line += f" {statistics.median(gpu[name]):7.3f} {statistics.median(rounds[name]):8.3f}"
        print(f"{line}  {case.stages()}")


if __name__ == "__main__":
    main()
